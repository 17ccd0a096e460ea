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
