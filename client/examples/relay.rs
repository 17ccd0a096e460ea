//! Benchmark baseline, part 2: a naive 2-hop relay. Each client connection gets its own
//! upstream connection, and bytes are copied both ways as they come — no parsing, no
//! multiplexing, no batching beyond what one read gives. It is the limit a "just forward it"
//! design reaches on this machine, for `scripts/bench.sh` to compare the balancer with.
//!
//!     cargo run --release -p client --example relay -- 127.0.0.1:7000 127.0.0.1:7001 [MODE]
//!
//! MODE says how answers (upstream to client) are moved; requests are always copied:
//!
//! - `copy` (the default, what `scripts/bench.sh` measures): read into user memory, write out.
//! - `copy-checked`: the same, and every answer line is also checked with the balancer's own
//!   answer check (`common::protocol::parse_answer`) where it was read.
//! - `splice-checked`: the answer bytes go socket → pipe → socket with `splice`, and a `tee`
//!   of them is read into user memory for the same check: the balancer's check without its
//!   send copy.
//! - `splice`: socket → pipe → socket, the bytes never reach user memory: what only a relay
//!   that needs not look at an answer (knowing its length from elsewhere) could do.
//!
//! `scripts/bench_relay_modes.sh` runs the four against one proxy with large values.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is fine

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, tee, PipeFlags, SpliceFlags};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Copy,
    CopyChecked,
    SpliceChecked,
    Splice,
}

/// Bytes read (or spliced) per call, and the pipes' capacity.
const CHUNK: usize = 1 << 20;
/// The answer lines the checked modes gather: the longest answer they can check.
const LINE_BUF: usize = 4 << 20;

/// One side of a pair: its socket and the bytes waiting to be written to it.
struct Side {
    stream: TcpStream,
    pending: Vec<u8>,
}

/// An answer stream's bytes in user memory, for the checked modes: read at `end`, checked
/// line by line from `start`.
struct Lines {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    checked: u64,
}

impl Lines {
    fn new() -> Lines {
        Lines { buf: vec![0; LINE_BUF], start: 0, end: 0, checked: 0 }
    }

    /// Room to read into, after moving a partial line to the front when the room is short.
    fn room(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < CHUNK {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        &mut self.buf[self.end..]
    }

    /// Takes `n` bytes read into [`Lines::room`] and checks every line they complete.
    fn filled(&mut self, n: usize) -> &[u8] {
        let from = self.end;
        self.end += n;
        while let Some(at) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
            let line = &self.buf[self.start..self.start + at];
            assert!(common::protocol::parse_answer(line).is_ok(), "the upstream sent a bad answer");
            self.checked += 1;
            self.start += at + 1;
        }
        assert!(self.end - self.start < LINE_BUF - CHUNK, "an answer longer than the relay checks");
        &self.buf[from..self.end]
    }
}

/// The pipes of a splicing pair: `relay` carries the bytes to the client, `look` receives a
/// `tee` of them to read (checked mode), `held` counts what `relay` holds.
struct Pipes {
    relay: (OwnedFd, OwnedFd),
    look: (OwnedFd, OwnedFd),
    held: usize,
}

impl Pipes {
    fn new() -> Pipes {
        let relay = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).unwrap();
        let look = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).unwrap();
        fcntl_setpipe_size(&relay.1, CHUNK).unwrap();
        fcntl_setpipe_size(&look.1, CHUNK).unwrap();
        Pipes { relay, look, held: 0 }
    }
}

struct Pair {
    client: Side,
    upstream: Side,
    lines: Option<Lines>,
    pipes: Option<Pipes>,
}

/// Reads everything available from `from` into `to.pending`, then writes what `to` takes.
/// Returns false once the pair should be closed.
fn pump(from: &mut Side, to: &mut Side, buf: &mut [u8]) -> bool {
    let mut open = true;
    loop {
        match from.stream.read(buf) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => to.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::NotConnected => break,
            Err(_) => return false,
        }
    }
    flush(to) && open
}

/// Writes what `to` has pending and it takes now; false once it failed.
fn flush(to: &mut Side) -> bool {
    while !to.pending.is_empty() {
        match to.stream.write(&to.pending) {
            Ok(n) => {
                to.pending.drain(..n);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => break,
            Err(_) => return false,
        }
    }
    true
}

/// `copy-checked`: answers are read where they are checked and written from there.
fn pump_checked(from: &mut Side, to: &mut Side, lines: &mut Lines) -> bool {
    if !flush(to) {
        return false;
    }
    loop {
        match from.stream.read(lines.room()) {
            Ok(0) => return false,
            Ok(n) => {
                let fresh = lines.filled(n);
                let mut sent = 0;
                while to.pending.is_empty() && sent < fresh.len() {
                    match to.stream.write(&fresh[sent..]) {
                        Ok(w) => sent += w,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => return false,
                    }
                }
                to.pending.extend_from_slice(&fresh[sent..]);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::NotConnected => return true,
            Err(_) => return false,
        }
    }
}

/// `splice` and `splice-checked`: answers go through a pipe; while the client does not take
/// what the pipe holds, nothing more is read (backpressure stays in the kernel).
fn pump_spliced(from: &mut Side, to: &mut Side, pipes: &mut Pipes, mut lines: Option<&mut Lines>) -> bool {
    let nonblock = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        while pipes.held > 0 {
            match splice(pipes.relay.0.as_fd(), None, to.stream.as_fd(), None, pipes.held, nonblock) {
                Ok(n) => pipes.held -= n,
                Err(rustix::io::Errno::AGAIN) => return true,
                Err(_) => return false,
            }
        }
        match splice(from.stream.as_fd(), None, pipes.relay.1.as_fd(), None, CHUNK, nonblock) {
            Ok(0) => return false,
            Ok(n) => {
                pipes.held = n;
                if let Some(lines) = lines.as_deref_mut() {
                    let teed = tee(pipes.relay.0.as_fd(), pipes.look.1.as_fd(), n, SpliceFlags::NONBLOCK).unwrap();
                    assert_eq!(teed, n, "the look pipe is as large as the relay pipe and empty");
                    let mut left = n;
                    while left > 0 {
                        let room = lines.room();
                        let want = left.min(room.len());
                        let got = rustix::io::read(&pipes.look.0, &mut room[..want]).unwrap();
                        lines.filled(got);
                        left -= got;
                    }
                }
            }
            Err(rustix::io::Errno::AGAIN) => return true,
            Err(rustix::io::Errno::NOTCONN) => return true,
            Err(_) => return false,
        }
    }
}

fn parse_mode(arg: Option<String>) -> Mode {
    match arg.as_deref() {
        None | Some("copy") => Mode::Copy,
        Some("copy-checked") => Mode::CopyChecked,
        Some("splice-checked") => Mode::SpliceChecked,
        Some("splice") => Mode::Splice,
        Some(other) => panic!("unknown mode {other:?}: copy, copy-checked, splice-checked or splice"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:7000".into()).parse().unwrap();
    let upstream: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:7001".into()).parse().unwrap();
    let mode = parse_mode(args.next());
    let mut poll = Poll::new().unwrap();
    let mut listener = TcpListener::bind(listen).unwrap();
    poll.registry().register(&mut listener, Token(0), Interest::READABLE).unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    // Pair n uses tokens 2n (client) and 2n + 1 (upstream).
    let mut pairs: HashMap<usize, Pair> = HashMap::new();
    let mut next = 1;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let both = Interest::READABLE | Interest::WRITABLE;
    loop {
        poll.poll(&mut events, None).unwrap();
        for event in events.iter() {
            if event.token() == Token(0) {
                while let Ok((mut client, _)) = listener.accept() {
                    let mut up = TcpStream::connect(upstream).unwrap();
                    client.set_nodelay(true).unwrap();
                    up.set_nodelay(true).unwrap();
                    poll.registry().register(&mut client, Token(2 * next), both).unwrap();
                    poll.registry().register(&mut up, Token(2 * next + 1), both).unwrap();
                    let checked = matches!(mode, Mode::CopyChecked | Mode::SpliceChecked);
                    let spliced = matches!(mode, Mode::SpliceChecked | Mode::Splice);
                    let pair = Pair {
                        client: Side { stream: client, pending: Vec::new() },
                        upstream: Side { stream: up, pending: Vec::new() },
                        lines: checked.then(Lines::new),
                        pipes: spliced.then(Pipes::new),
                    };
                    pairs.insert(next, pair);
                    next += 1;
                }
                continue;
            }
            let id = event.token().0 / 2;
            let Some(pair) = pairs.get_mut(&id) else { continue };
            let answers_open = match (&mut pair.pipes, &mut pair.lines) {
                (Some(pipes), lines) => pump_spliced(&mut pair.upstream, &mut pair.client, pipes, lines.as_mut()),
                (None, Some(lines)) => pump_checked(&mut pair.upstream, &mut pair.client, lines),
                (None, None) => pump(&mut pair.upstream, &mut pair.client, &mut buf),
            };
            let open = pump(&mut pair.client, &mut pair.upstream, &mut buf) && answers_open;
            if !open {
                pairs.remove(&id);
            }
        }
    }
}
