//! A connection from a service to the next tier (proxy → origin, balancer → proxy): a
//! non-blocking connect, buffered writes, and answer lines read as they arrive.
//!
//! It is I/O only. What a line means, how many requests may be outstanding, and when to give
//! up belong to the service that owns it.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::framing::{next_frame_from, read_once, Frame, OutBuf, SharedBytes};

/// Bytes read per `read` call on an upstream socket.
const READ_CHUNK: usize = 64 * 1024;

/// Input capacity kept once the buffer empties: answers up to about this size come and go
/// without the buffer growing and shrinking each time (no allocation, no `mremap` per answer).
/// Only a burst beyond it is given back afterwards.
pub const RETAINED_INPUT: usize = 1024 * 1024;

/// Answer lines at least this long may be handed out as [`SharedBytes`] of the input buffer
/// ([`Upstream::share`]) instead of being copied; shorter ones are cheaper to copy than to pin
/// a buffer for.
pub const SHARE_LINE_MIN: usize = 32 * 1024;

#[derive(Debug)]
pub struct Upstream {
    stream: TcpStream,
    token: Token,
    connected: bool,
    /// Received bytes live in `input[start..end]`; `input` is zeroed once when it grows, so
    /// reads do not pay for clearing memory. It is reference counted so that a long answer
    /// line can be passed on from where it was read ([`Upstream::share`]); while such a view
    /// lives, reading continues in `spare` (or a new buffer) and the bytes not yet used move.
    input: Arc<Vec<u8>>,
    /// The buffer given up while it was still shared, reused once nobody holds it.
    spare: Option<Arc<Vec<u8>>>,
    start: usize,
    end: usize,
    /// `input[start..scanned]` holds no `\n`: a long line arriving in many reads is searched
    /// once, not again from its start after every read.
    scanned: Cell<usize>,
    out: OutBuf,
    eof: bool,
    /// Bytes received over the connection's life: comparing it before and after a request
    /// tells whether the peer said anything to that request.
    received: u64,
}

/// What a readiness event did.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Progress {
    /// Still connecting; nothing else to do.
    Connecting,
    /// Connected; any input read is available through [`Upstream::frame`].
    Ready,
}

impl Upstream {
    /// Starts a non-blocking connect and registers for both readiness kinds: edge-triggered,
    /// so an idle connection costs no wake-ups, and a close is noticed while idle.
    pub fn connect(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<Upstream> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let _ = stream.set_nodelay(true);
        Ok(Upstream {
            stream,
            token,
            connected: false,
            input: Arc::new(Vec::new()),
            spare: None,
            start: 0,
            end: 0,
            scanned: Cell::new(0),
            out: OutBuf::new(),
            eof: false,
            received: 0,
        })
    }

    pub fn token(&self) -> Token {
        self.token
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The peer closed its side.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    pub fn received_bytes(&self) -> u64 {
        self.received
    }

    /// Queues `bytes` and writes what the socket takes now (nothing until connected).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.extend(bytes);
        self.flush()
    }

    /// The buffer to append whole requests to; call [`Upstream::flush`] afterwards.
    pub fn out_buf(&mut self) -> &mut Vec<u8> {
        self.out.buf_mut()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if self.connected {
            self.out.flush_to(&mut self.stream)?;
        }
        Ok(())
    }

    /// Handles a readiness event: completes the connect, writes what is queued, and reads
    /// everything available (stopping early once more than `max_line` bytes are buffered
    /// without a complete line, which [`Upstream::frame`] then reports as too long). An error
    /// means the connection is unusable (refused, reset, ...).
    pub fn on_ready(&mut self, max_line: usize) -> io::Result<Progress> {
        if !self.connected {
            if let Some(e) = self.stream.take_error()? {
                return Err(e);
            }
            match self.stream.peer_addr() {
                Ok(_) => self.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(Progress::Connecting),
                Err(e) => return Err(e),
            }
        }
        self.flush()?;
        while !self.eof && self.end - self.start <= max_line {
            self.make_room();
            // Unique: `make_room` swaps a shared buffer out.
            let Some(input) = Arc::get_mut(&mut self.input) else { break };
            match read_once(&mut self.stream, input.get_mut(self.end..).unwrap_or_default()) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.end += n;
                    self.received += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Progress::Ready)
    }

    /// The next complete answer line in the input, if any. Call [`Upstream::consume`] with
    /// the length it reports once the line has been used.
    pub fn frame(&self, max_line: usize) -> Frame<'_> {
        let buffered = self.input.get(self.start..self.end).unwrap_or_default();
        let scanned = self.scanned.get().saturating_sub(self.start);
        let (frame, scanned) = next_frame_from(buffered, scanned, max_line);
        self.scanned.set(self.start + scanned);
        frame
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        self.scanned.set(self.scanned.get().max(self.start));
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.scanned.set(0);
            if self.input.len() > RETAINED_INPUT {
                // A burst bigger than what is kept: give it back, and the spare with it.
                self.input = Arc::new(Vec::new());
                self.spare = None;
            }
            if self.spare.as_ref().is_some_and(|spare| spare.len() > RETAINED_INPUT) {
                self.spare = None;
            }
        }
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// `part` of the input (a line [`Upstream::frame`] gave, or a piece of one) as shared
    /// bytes, without copying; `None` when it is shorter than [`SHARE_LINE_MIN`] (copy it) or
    /// not part of the input. The view keeps the input buffer alive (and counts it, SPEC 3.8)
    /// until it is dropped; reading goes on in another buffer meanwhile.
    pub fn share(&self, part: &[u8]) -> Option<SharedBytes> {
        if part.len() < SHARE_LINE_MIN {
            return None;
        }
        SharedBytes::of_part(&self.input, part)
    }

    /// Capacity of the input buffer (for tests of its bounds).
    pub fn input_capacity(&self) -> usize {
        self.input.len()
    }

    /// The input buffer with room after `end` for one more read: the bytes not yet consumed
    /// move to the front only when the room behind them runs short (not on every event, so a
    /// long line is not copied over and over while it arrives), and the buffer doubles only
    /// when it is more than half full of them. A buffer shared with answers still being
    /// written is left to them: the unconsumed bytes move to the spare or a new buffer.
    fn make_room(&mut self) {
        let unconsumed = self.end - self.start;
        let room = self.input.len() - self.end;
        let wanted = if unconsumed * 2 > self.input.len() { self.input.len() * 2 } else { self.input.len() };
        let wanted = wanted.max(READ_CHUNK);
        if Arc::get_mut(&mut self.input).is_none() {
            let mut fresh = self.spare.take().filter(|spare| Arc::strong_count(spare) == 1).unwrap_or_default();
            if Arc::get_mut(&mut fresh).is_none() {
                fresh = Arc::default();
            }
            // Sized for what it must hold, not like the buffer given up: a new buffer may be
            // pinned in turn by an answer that waits, and should not be mostly empty then.
            let wanted = (unconsumed * 2).max(READ_CHUNK * 2);
            if let Some(buf) = Arc::get_mut(&mut fresh) {
                if buf.len() < wanted {
                    buf.resize(wanted, 0);
                }
                buf[..unconsumed].copy_from_slice(&self.input[self.start..self.end]);
            }
            self.spare = Some(std::mem::replace(&mut self.input, fresh));
            self.move_to_front();
        } else if room < READ_CHUNK / 2 {
            if self.start > 0 {
                if let Some(buf) = Arc::get_mut(&mut self.input) {
                    buf.copy_within(self.start..self.end, 0);
                }
                self.move_to_front();
            }
            if self.input.len() - self.end < READ_CHUNK / 2 {
                if let Some(buf) = Arc::get_mut(&mut self.input) {
                    buf.resize(wanted.max(buf.len() + READ_CHUNK), 0);
                }
            }
        }
    }

    /// The unconsumed bytes now start at 0.
    fn move_to_front(&mut self) {
        self.end -= self.start;
        self.scanned.set(self.scanned.get().saturating_sub(self.start));
        self.start = 0;
    }

    /// Stops watching the socket; dropping the `Upstream` afterwards closes it.
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// An upstream connected to a plain socket the test writes answers into.
    fn pair() -> (mio::Poll, Upstream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let poll = mio::Poll::new().unwrap();
        let up = Upstream::connect(listener.local_addr().unwrap(), poll.registry(), Token(7)).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (poll, up, peer)
    }

    /// Reads until a complete line is buffered (bounded in time).
    fn wait_line(poll: &mut mio::Poll, up: &mut Upstream) -> usize {
        let mut events = mio::Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            up.on_ready(usize::MAX / 2).unwrap();
            if let Frame::Line(_, n) = up.frame(16 << 20) {
                return n;
            }
            assert!(Instant::now() < deadline, "no line within 10 s");
            poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
        }
    }

    fn answer(len: usize, fill: u8) -> Vec<u8> {
        let mut line = vec![fill; len];
        line.push(b'\n');
        line
    }

    #[test]
    fn the_input_buffer_keeps_one_capacity_across_large_answers() {
        let (mut poll, mut up, mut peer) = pair();
        let mut capacities = Vec::new();
        for i in 0..40u8 {
            peer.write_all(&answer(300 * 1024, b'a' + i % 26)).unwrap();
            let n = wait_line(&mut poll, &mut up);
            assert_eq!(n, 300 * 1024 + 1);
            capacities.push(up.input_capacity());
            up.consume(n);
            capacities.push(up.input_capacity());
        }
        // It grows to hold one answer once, then neither grows nor shrinks per answer.
        let settled = capacities[4];
        assert!(capacities[4..].iter().all(|c| *c == settled), "{capacities:?}");
        assert!(settled <= RETAINED_INPUT, "{settled}");
    }

    #[test]
    fn a_burst_beyond_the_retained_capacity_is_given_back() {
        let (mut poll, mut up, mut peer) = pair();
        peer.write_all(&answer(3 * RETAINED_INPUT, b'x')).unwrap();
        let n = wait_line(&mut poll, &mut up);
        assert!(up.input_capacity() > RETAINED_INPUT);
        up.consume(n);
        assert!(up.input_capacity() <= RETAINED_INPUT);
    }

    #[test]
    fn a_shared_line_stays_intact_while_reading_goes_on() {
        let (mut poll, mut up, mut peer) = pair();
        let mut held = Vec::new();
        for i in 0..12u8 {
            peer.write_all(&answer(100 * 1024, b'a' + i)).unwrap();
            let n = wait_line(&mut poll, &mut up);
            let Frame::Line(line, _) = up.frame(16 << 20) else { unreachable!() };
            let shared = up.share(line).expect("a long line is shared");
            assert_eq!(shared.len(), 100 * 1024);
            up.consume(n);
            held.push((i, shared));
            // Every other view is dropped, so buffers get reused while others stay pinned.
            if i % 2 == 1 {
                held.remove(0);
            }
        }
        for (i, shared) in &held {
            assert!(shared.iter().all(|b| *b == b'a' + i), "view {i} was overwritten");
        }
        let Frame::Incomplete = up.frame(16 << 20) else { panic!("nothing left") };
        assert!(up.share(b"short").is_none());
    }

    #[test]
    fn a_partial_line_carries_over_into_a_new_buffer() {
        let (mut poll, mut up, mut peer) = pair();
        let first = answer(64 * 1024, b'1');
        let second = answer(200 * 1024, b'2');
        let mut bytes = first.clone();
        bytes.extend_from_slice(&second[..1000]);
        peer.write_all(&bytes).unwrap();
        let n = wait_line(&mut poll, &mut up);
        let Frame::Line(line, _) = up.frame(16 << 20) else { unreachable!() };
        let view = up.share(line).unwrap();
        up.consume(n);
        peer.write_all(&second[1000..]).unwrap();
        let n = wait_line(&mut poll, &mut up);
        let Frame::Line(line, _) = up.frame(16 << 20) else { unreachable!() };
        assert_eq!(line, &second[..second.len() - 1]);
        assert_eq!(&view[..], &first[..first.len() - 1]);
        up.consume(n);
        assert_eq!(up.buffered(), 0);
    }
}
