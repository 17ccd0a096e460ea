//! Benchmark baseline, part 2: a naive 2-hop relay. Each client connection gets its own
//! upstream connection, and bytes are copied both ways as they come — no parsing, no
//! multiplexing, no batching beyond what one read gives. It is the limit a "just forward it"
//! design reaches on this machine, for `scripts/bench.sh` to compare the balancer with.
//!
//!     cargo run --release -p client --example relay -- 127.0.0.1:7000 127.0.0.1:7001 [MODE]
//!
//! MODE says how answers (upstream to client) are moved; requests are always copied:
//!
//! - `copy` (the default, what `scripts/bench.sh` measures): read into user memory, write out,
//!   [`COPY_BUF`] bytes per read (as ever: it is the W1 baseline).
//! - `copy-checked`: the same, and every answer line is also checked with the balancer's own
//!   answer check (`common::protocol::parse_answer`) where it was read.
//! - `splice-checked`: the answer bytes go socket → pipe → socket with `splice`, and a `tee`
//!   of them is read into user memory for the same check: the balancer's check without its
//!   send copy.
//! - `splice`: socket → pipe → socket, the bytes never reach user memory: what only a relay
//!   that needs not look at an answer (knowing its length from elsewhere) could do.
//!
//! The modes other than `copy` read (or splice) at most [`CHUNK`] bytes per call; requests
//! are read [`COPY_BUF`] bytes at a time in every mode.
//!
//! When one side closes, what the other side is still owed (bytes read but not yet written,
//! or held in the pipe) is written before the pair is closed.
//!
//! `scripts/bench_relay_modes.sh` runs the four (by default) against one proxy with large
//! values.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is fine

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Once;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, tee, PipeFlags, SpliceFlags};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Copy,
    CopyChecked,
    SpliceChecked,
    Splice,
}

/// The most bytes read (or spliced) per call in the modes other than `copy`, and the size the
/// pipes are asked for (`/proc/sys/fs/pipe-max-size`, 1 MiB, by default).
const CHUNK: usize = 1 << 20;
/// The buffer `copy` reads answers into, and every mode reads requests into. Kept at what it
/// always was rather than [`CHUNK`]: `scripts/bench.sh` measures `copy` as the W1 baseline.
const COPY_BUF: usize = 64 * 1024;
/// What the checked modes gather answer lines in: a partial line plus one read of up to
/// [`CHUNK`] bytes. So the longest answer line they can check is `LINE_BUF - CHUNK - 1`
/// bytes (3 MiB - 1) before its newline; a longer one trips the assert in [`Lines::filled`].
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

    /// Room to read into, [`CHUNK`] bytes, after moving a partial line to the front when the
    /// room is short. There always is that much: [`Lines::filled`] keeps a partial line
    /// shorter than `LINE_BUF - CHUNK`.
    fn room(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < CHUNK {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        &mut self.buf[self.end..self.end + CHUNK]
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

/// The pipes of a splicing pair: `relay` carries the bytes to the client, `look` (only in
/// `splice-checked`) receives a `tee` of them to read, `held` counts what `relay` holds.
struct Pipes {
    relay: (OwnedFd, OwnedFd),
    look: Option<(OwnedFd, OwnedFd)>,
    held: usize,
}

impl Pipes {
    fn new(checked: bool) -> Pipes {
        let relay = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).unwrap();
        let look = checked.then(|| pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).unwrap());
        let size = enlarge(&relay.1);
        if let Some(look) = &look {
            // `tee` must fit all that `relay` holds into the empty `look`: both the same size.
            let look_size = enlarge(&look.1);
            if look_size != size {
                let both = size.min(look_size); // shrinking an empty pipe always works
                fcntl_setpipe_size(&relay.1, both).unwrap();
                fcntl_setpipe_size(&look.1, both).unwrap();
            }
        }
        Pipes { relay, look, held: 0 }
    }
}

/// Asks for a pipe of [`CHUNK`] bytes; returns the size it has. An unprivileged user is
/// refused (EPERM) once its pipes hold more than `/proc/sys/fs/pipe-user-pages-soft` pages
/// (16384, 64 MiB, by default: 64 pipes of 1 MiB), and its new pipes then get only 2 pages.
/// Rather than fail, the pipe keeps the size it has: slower (more, smaller splices), still
/// correct. Said once on stderr.
fn enlarge(pipe: &OwnedFd) -> usize {
    match fcntl_setpipe_size(pipe, CHUNK) {
        Ok(size) => size,
        Err(e) => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                let limit = "/proc/sys/fs/pipe-user-pages-soft";
                eprintln!("relay: pipes cannot grow to {CHUNK} bytes ({e}; see {limit}): keeping their default size");
            });
            fcntl_getpipe_size(pipe).unwrap()
        }
    }
}

struct Pair {
    client: Side,
    upstream: Side,
    lines: Option<Lines>,
    pipes: Option<Pipes>,
    /// Set once one side has closed: the other side, which is only written to from then on,
    /// until it has what it is owed.
    closing: Option<Owed>,
}

/// The side a closing pair still writes to.
#[derive(Clone, Copy)]
enum Owed {
    /// The upstream closed: the client gets the answer bytes read or spliced before that.
    Client,
    /// The client closed: the upstream gets the requests read before that.
    Upstream,
}

/// What a pump left its direction in.
#[derive(PartialEq)]
enum Flow {
    /// Read all there is for now; what was read is written or pending.
    Open,
    /// The sender closed; what it sent before is written or pending.
    Closed,
    /// A read or a write failed: the pair is dropped.
    Failed,
}

/// Reads everything available from `from` into `to.pending`, then writes what `to` takes.
fn pump(from: &mut Side, to: &mut Side, buf: &mut [u8]) -> Flow {
    let mut flow = Flow::Open;
    loop {
        match from.stream.read(buf) {
            Ok(0) => {
                flow = Flow::Closed;
                break;
            }
            Ok(n) => to.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::NotConnected => break,
            Err(_) => return Flow::Failed,
        }
    }
    if flush(to) {
        flow
    } else {
        Flow::Failed
    }
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
fn pump_checked(from: &mut Side, to: &mut Side, lines: &mut Lines) -> Flow {
    if !flush(to) {
        return Flow::Failed;
    }
    loop {
        match from.stream.read(lines.room()) {
            Ok(0) => return Flow::Closed,
            Ok(n) => {
                let fresh = lines.filled(n);
                let mut sent = 0;
                while to.pending.is_empty() && sent < fresh.len() {
                    match to.stream.write(&fresh[sent..]) {
                        Ok(w) => sent += w,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => return Flow::Failed,
                    }
                }
                to.pending.extend_from_slice(&fresh[sent..]);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Flow::Open,
            Err(e) if e.kind() == ErrorKind::NotConnected => return Flow::Open,
            Err(_) => return Flow::Failed,
        }
    }
}

/// `splice` and `splice-checked`: answers go through a pipe; while the client does not take
/// what the pipe holds, nothing more is read (backpressure stays in the kernel). The pipe is
/// emptied before the upstream is read again, so on its EOF nothing is left in the pipe.
fn pump_spliced(from: &mut Side, to: &mut Side, pipes: &mut Pipes, mut lines: Option<&mut Lines>) -> Flow {
    let nonblock = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        while pipes.held > 0 {
            match splice(pipes.relay.0.as_fd(), None, to.stream.as_fd(), None, pipes.held, nonblock) {
                Ok(n) => pipes.held -= n,
                Err(rustix::io::Errno::AGAIN) => return Flow::Open,
                Err(_) => return Flow::Failed,
            }
        }
        match splice(from.stream.as_fd(), None, pipes.relay.1.as_fd(), None, CHUNK, nonblock) {
            Ok(0) => return Flow::Closed,
            Ok(n) => {
                pipes.held = n;
                if let Some(lines) = lines.as_deref_mut() {
                    let look = pipes.look.as_ref().expect("splice-checked has a look pipe");
                    let teed = tee(pipes.relay.0.as_fd(), look.1.as_fd(), n, SpliceFlags::NONBLOCK).unwrap();
                    assert_eq!(teed, n, "the look pipe is as large as the relay pipe and empty");
                    let mut left = n;
                    while left > 0 {
                        let room = lines.room();
                        let want = left.min(room.len());
                        let got = rustix::io::read(&look.0, &mut room[..want]).unwrap();
                        lines.filled(got);
                        left -= got;
                    }
                }
            }
            Err(rustix::io::Errno::AGAIN) => return Flow::Open,
            Err(rustix::io::Errno::NOTCONN) => return Flow::Open,
            Err(_) => return Flow::Failed,
        }
    }
}

/// Moves answers (upstream to client) the pair's way.
fn answers(pair: &mut Pair, buf: &mut [u8]) -> Flow {
    match (&mut pair.pipes, &mut pair.lines) {
        (Some(pipes), lines) => pump_spliced(&mut pair.upstream, &mut pair.client, pipes, lines.as_mut()),
        (None, Some(lines)) => pump_checked(&mut pair.upstream, &mut pair.client, lines),
        (None, None) => pump(&mut pair.upstream, &mut pair.client, buf),
    }
}

/// A pair's work on one of its events; false once the pair is to be dropped.
fn step(pair: &mut Pair, buf: &mut [u8]) -> bool {
    let owed = match pair.closing {
        None => {
            // Answers first, then requests, as ever; a side that closed stops the relaying.
            match answers(pair, buf) {
                Flow::Open => match pump(&mut pair.client, &mut pair.upstream, buf) {
                    Flow::Open => return true,
                    Flow::Closed => Owed::Upstream,
                    Flow::Failed => return false,
                },
                Flow::Closed => Owed::Client,
                Flow::Failed => return false,
            }
        }
        // Closing: the pump of the owed direction writes what is left (the closed side's read
        // just gives EOF again); the other direction is left alone, so that nothing is written
        // to a side that closed.
        Some(owed) => {
            let flow = match owed {
                Owed::Client => answers(pair, buf),
                Owed::Upstream => pump(&mut pair.client, &mut pair.upstream, buf),
            };
            if flow == Flow::Failed {
                return false;
            }
            owed
        }
    };
    pair.closing = Some(owed);
    match owed {
        Owed::Client => !pair.client.pending.is_empty() || pair.pipes.as_ref().is_some_and(|p| p.held > 0),
        Owed::Upstream => !pair.upstream.pending.is_empty(),
    }
}

/// Before a closing pair is dropped: reads and discards what the owed side sent meanwhile, as
/// closing a socket with unread bytes resets the connection, which throws away what its send
/// buffer still holds for the peer: the very bytes that side was owed.
fn discard_input(side: &mut Side, buf: &mut [u8]) {
    while matches!(side.stream.read(buf), Ok(n) if n > 0) {}
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
    let mut buf = vec![0u8; COPY_BUF];
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
                        // Only the pipes its mode uses: none in the copy modes.
                        pipes: spliced.then(|| Pipes::new(checked)),
                        closing: None,
                    };
                    pairs.insert(next, pair);
                    next += 1;
                }
                continue;
            }
            let id = event.token().0 / 2;
            let Some(pair) = pairs.get_mut(&id) else { continue };
            if !step(pair, &mut buf) {
                match pair.closing {
                    Some(Owed::Client) => discard_input(&mut pair.client, &mut buf),
                    Some(Owed::Upstream) => discard_input(&mut pair.upstream, &mut buf),
                    None => {}
                }
                // Dropping closes both sockets: the owed side gets its last bytes, then EOF.
                pairs.remove(&id);
            }
        }
    }
}
